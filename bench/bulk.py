"""Bulk Data export throughput and server memory at 100k and 1M resources, and transaction ingest,
on SQLite and PostgreSQL.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python bench/bulk.py                                      # 100k and 1M, both databases
    .venv/bin/python bench/bulk.py --resources 20000 --db sqlite        # a quick run

For each database and scale, a fresh database is filled in-process with the synthetic population of
bench/common.py (Patients with their Encounters, CareTeam and CarePlan; GP practices, practitioners)
by a pool of worker processes through `FhirService.bulk_put`; by default without validation (the
population is valid, and loading is not what is measured here). Then `carebroker serve --workers 2`
is started on it and:

  - export: `GET /fhir/$export` (every type), polled every 0.1 s until the manifest. resources/s is
    the resources exported over the time from kick-off to manifest, which includes the second a job
    waits after its transaction time before it starts;
  - download: every file streamed with httpx and every line parsed: each stored resource must come
    back exactly once, and the counts per type must be the population's;
  - memory: the peak resident set size (VmHWM, /proc) of every server process, set against its
    resident size just before the kick-off (the export runs in a thread of one of the workers);
  - transaction ingest: Bundles of 100 new resources (patients with their Encounters, CareTeam,
    CarePlan and Observations, linked by `urn:uuid:` fullUrls) POSTed to `/fhir` by a few client
    threads; every response is checked (transaction-response, 100 entries created).

Client and server share the machine's CPUs, so the figures are lower bounds. Results: a table on
stdout, JSON in bench/results/bulk-<db>-<resources>.json (with the machine and the code measured).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson

from common import (N_ORGS, N_PRACTITIONERS, RESULTS, BenchError, Population, add_run_arguments, after_load,
                    check_code, code_fingerprint, database, databases, load, log, machine_facts, patient_resources,
                    person, process_tree, server, workdir_for)

ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
RESOURCES_PER_PATIENT = 10  # on average (Patient, 4-10 Encounters, CareTeam, CarePlan)
TX_SIZE = 100


def memory(pids: list[int]) -> dict[int, dict[str, int]]:
    """VmRSS and VmHWM (kB) of each process, from /proc/<pid>/status."""
    out: dict[int, dict[str, int]] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            out[pid] = {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}
    return out


def measure_export(client: httpx.Client, base: str, pid: int, pop: Population) -> dict[str, Any]:
    """Kick off a system export, wait for the manifest, download and check every file."""
    pids = process_tree(pid)
    before = memory(pids)
    started = time.perf_counter()
    kick = client.get(f"{base}/$export", headers=ASYNC)
    if kick.status_code != 202:
        raise BenchError(f"kick-off answered {kick.status_code}: {kick.text[:500]}")
    status_url = kick.headers["content-location"]
    while (status := client.get(status_url)).status_code == 202:
        time.sleep(0.1)
    if status.status_code != 200:
        raise BenchError(f"export failed: {status.status_code} {status.text[:1000]}")
    export_s = time.perf_counter() - started
    manifest = status.json()
    exported = sum(o["count"] for o in manifest["output"])

    started = time.perf_counter()
    seen: set[bytes] = set()
    per_type: Counter[str] = Counter()
    size = 0
    for out in manifest["output"]:
        lines = 0
        with client.stream("GET", out["url"], headers={"Accept": "application/fhir+ndjson"}) as resp:
            if resp.status_code != 200:
                raise BenchError(f"file {out['url']} answered {resp.status_code}")
            pending = b""
            for piece in resp.iter_bytes():
                size += len(piece)
                *complete, pending = (pending + piece).split(b"\n")
                for line in complete:
                    res = orjson.loads(line)
                    key = f"{res['resourceType']}/{res['id']}".encode()
                    if key in seen:
                        raise BenchError(f"{key.decode()} exported twice")
                    seen.add(key)
                    per_type[res["resourceType"]] += 1
                    lines += 1
            if pending:
                raise BenchError(f"file {out['url']} does not end with a newline")
        if lines != out["count"]:
            raise BenchError(f"file {out['url']}: {lines} lines, the manifest says {out['count']}")
    download_s = time.perf_counter() - started
    after = memory(pids)
    expected = Counter({"Organization": N_ORGS, "Practitioner": N_PRACTITIONERS, "Patient": pop.size,
                        "CareTeam": pop.size, "CarePlan": pop.size,
                        "Encounter": sum(len(p.encounters) for p in pop.people)})
    if per_type != expected or exported != pop.resources:
        raise BenchError(f"exported {dict(per_type)} ({exported} in the manifest), stored {dict(expected)}")
    return {
        "resources": exported, "files": len(manifest["output"]), "bytes": size,
        "export_seconds": round(export_s, 2), "export_resources_per_s": round(exported / export_s),
        "download_seconds": round(download_s, 2), "download_resources_per_s": round(exported / download_s),
        "download_mb_per_s": round(size / 1e6 / download_s, 1),
        "server_processes": [{"pid": p, "rss_before_kb": before.get(p, {}).get("VmRSS"),
                              "hwm_before_kb": before.get(p, {}).get("VmHWM"),
                              "hwm_after_kb": after.get(p, {}).get("VmHWM")} for p in pids],
        "peak_rss_mb": round(max(m["VmHWM"] for m in after.values()) / 1024, 1),
    }


def transaction_bundles(pop: Population, count: int) -> list[dict[str, Any]]:
    """`count` transaction Bundles of exactly TX_SIZE new resources: whole patients (numbered after the
    loaded population) with their records, topped up with body-weight Observations of its patients."""
    bundles: list[dict[str, Any]] = []
    n = pop.size
    for _ in range(count):
        entries: list[dict[str, Any]] = []
        patients: list[str] = []
        while True:
            records = patient_resources(person(pop.seed, n))
            if len(entries) + len(records) > TX_SIZE:
                break
            n += 1
            urns = {f"{r['resourceType']}/{r['id']}": f"urn:uuid:{uuid.uuid4()}" for r in records}
            for r in records:
                body = json.loads(json.dumps({k: v for k, v in r.items() if k != "id"}))
                _point_to(body, urns)
                entries.append({"fullUrl": urns[f"{r['resourceType']}/{r['id']}"], "resource": body,
                                "request": {"method": "POST", "url": r["resourceType"]}})
            patients.append(urns[f"Patient/{records[0]['id']}"])
        for i in range(TX_SIZE - len(entries)):
            entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "request": {"method": "POST", "url": "Observation"},
                            "resource": {"resourceType": "Observation", "status": "final",
                                         "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                                         "subject": {"reference": patients[i % len(patients)]},
                                         "valueQuantity": {"value": 60 + i, "unit": "kg", "system": "http://unitsofmeasure.org",
                                                           "code": "kg"}}})
        bundles.append({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return bundles


def _point_to(node: Any, urns: dict[str, str]) -> None:
    """References to resources of the same Bundle become their urn:uuid fullUrls."""
    if isinstance(node, dict):
        if isinstance(ref := node.get("reference"), str) and ref in urns:
            node["reference"] = urns[ref]
        for value in node.values():
            _point_to(value, urns)
    elif isinstance(node, list):
        for value in node:
            _point_to(value, urns)


def measure_transactions(base: str, pop: Population, args: argparse.Namespace) -> dict[str, Any]:
    bundles = transaction_bundles(pop, args.tx_bundles)
    payloads = [orjson.dumps(b) for b in bundles]
    local = threading.local()

    def post(body: bytes) -> float:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
        t0 = time.perf_counter()
        resp = local.client.post(base, content=body, headers={"Content-Type": "application/fhir+json"})
        took = time.perf_counter() - t0
        if resp.status_code != 200:
            raise BenchError(f"transaction answered {resp.status_code}: {resp.text[:1000]}")
        out = resp.json()
        statuses = [e["response"]["status"] for e in out.get("entry", [])]
        if out.get("type") != "transaction-response" or len(statuses) != TX_SIZE or \
                any(not s.startswith("201") for s in statuses):
            raise BenchError(f"transaction response not as expected: {str(out)[:1000]}")
        return took

    started = time.perf_counter()
    with ThreadPoolExecutor(args.tx_clients) as pool:
        latencies = sorted(pool.map(post, payloads))
    seconds = time.perf_counter() - started
    return {"bundles": len(bundles), "bundle_size": TX_SIZE, "clients": args.tx_clients,
            "seconds": round(seconds, 2), "resources_per_s": round(len(bundles) * TX_SIZE / seconds),
            "bundle_p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
            "bundle_p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1)}


def bench_one(db: str, pop: Population, workdir: Path, args: argparse.Namespace,
              code: dict[str, str]) -> dict[str, Any]:
    run: dict[str, Any] = {"db": db, "resources": pop.resources, "patients": pop.size, "seed": pop.seed,
                           "code": code, "code_changed": False,
                           "load_average_before": Path("/proc/loadavg").read_text().split()[:3]}
    with database(db, f"bulk-{pop.resources}", workdir, args) as url:
        log(f"[{db} {pop.resources:,}] loading ({args.processes} processes)")
        run["load"] = load(url, pop, args)
        run["database"] = after_load(url, db, pop, args)
        log(f"[{db} {pop.resources:,}] loaded in {run['load']['seconds']} s; {run['database']['size_bytes'] / 1e6:,.0f} MB")
        check_code(run, "after loading")
        with server(url, args.workers, workdir / f"server-bulk-{db}-{pop.resources}.log") as srv:
            with httpx.Client(timeout=120) as client:
                run["export"] = measure_export(client, srv.base, srv.pid, pop)
            ex = run["export"]
            log(f"[{db} {pop.resources:,}] export {ex['export_resources_per_s']:,}/s ({ex['export_seconds']} s), "
                f"download {ex['download_resources_per_s']:,}/s, peak RSS {ex['peak_rss_mb']} MB")
            if args.tx_bundles:
                run["transactions"] = measure_transactions(srv.base, pop, args)
                tx = run["transactions"]
                log(f"[{db} {pop.resources:,}] transactions {tx['resources_per_s']:,} resources/s "
                    f"(p50 {tx['bundle_p50_ms']} ms per Bundle of {TX_SIZE})")
        run["load_average_after"] = Path("/proc/loadavg").read_text().split()[:3]
        check_code(run, "after measuring")
    return run


def print_run(run: dict[str, Any]) -> None:
    ex = run["export"]
    print(f"\n== {run['db']}, {run['resources']:,} resources ({run['database']['size_bytes'] / 1e6:,.0f} MB database; "
          f"load average {' '.join(run['load_average_before'])} / {' '.join(run['load_average_after'])}) ==")
    print(f"export    {ex['export_resources_per_s']:>9,} resources/s  ({ex['resources']:,} in {ex['export_seconds']} s, "
          f"{ex['files']} files, {ex['bytes'] / 1e6:,.0f} MB NDJSON; includes the 1 s start delay)")
    print(f"download  {ex['download_resources_per_s']:>9,} resources/s  ({ex['download_seconds']} s, "
          f"{ex['download_mb_per_s']} MB/s, every line parsed and checked)")
    print(f"memory    peak RSS {ex['peak_rss_mb']} MB (max VmHWM over the server's processes); per process "
          + ", ".join(f"{p['pid']}: {(p['rss_before_kb'] or 0) // 1024}->{(p['hwm_after_kb'] or 0) // 1024} MB"
                      for p in ex["server_processes"]))
    if tx := run.get("transactions"):
        print(f"ingest    {tx['resources_per_s']:>9,} resources/s  ({tx['bundles']} transaction Bundles of "
              f"{tx['bundle_size']}, {tx['clients']} clients; per Bundle p50 {tx['bundle_p50_ms']} ms, "
              f"p99 {tx['bundle_p99_ms']} ms)")
    if run["code_changed"]:
        print("!!! THE SERVER CODE CHANGED DURING THIS RUN: these figures mix two versions !!!")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resources", default="100000,1000000", help="comma-separated scales (about; default 100000,1000000)")
    add_run_arguments(parser)
    parser.add_argument("--validate", action="store_true", help="validate the population while loading it")
    parser.add_argument("--tx-bundles", type=int, default=200, help="transaction Bundles to POST (0: skip)")
    parser.add_argument("--tx-clients", type=int, default=4, help="client threads POSTing them")
    args = parser.parse_args(argv)
    args.no_validate, args.sqlite_analyze = not args.validate, False  # what common.load/after_load read

    scales = [int(s) for s in args.resources.split(",") if s.strip()]
    dbs = databases(args, parser)
    RESULTS.mkdir(exist_ok=True)
    facts = machine_facts()
    code = code_fingerprint()
    with contextlib.ExitStack() as stack:
        workdir = workdir_for(args, stack, "carebroker-bulk-")
        log(f"code {code['git_head']} (source {code['source_sha256']}); workdir {workdir}: "
            f"{shutil.disk_usage(workdir).free / 1e9:,.0f} GB free; {facts['nproc']} CPUs")
        runs = []
        for target in scales:
            pop = Population(args.seed, max(1, (target - N_ORGS - N_PRACTITIONERS) // RESOURCES_PER_PATIENT))
            for db in dbs:
                run = bench_one(db, pop, workdir, args, code)
                run["machine"] = facts
                run["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
                (RESULTS / f"bulk-{db}-{target}.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
                runs.append(run)
                print_run(run)
                sys.stdout.flush()
    print(f"\nmachine: {facts['nproc']} CPUs ({facts['cpu_model']}), shared with other work; client and server on "
          f"the same CPUs: figures are lower bounds. JSON in {RESULTS}/bulk-<db>-<resources>.json")
    return 3 if any(r["code_changed"] for r in runs) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"\n!!! BENCHMARK FAILED: {exc}", file=sys.stderr)
        sys.exit(2)
